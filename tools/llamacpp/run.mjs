// llama.cpp, as a user of node-llama-cpp runs it, for qfine's export checks (prebuilt CPU binaries,
// never built or downloaded here).
//
//   node run.mjs REQUEST.json   ->  one JSON object on stdout
//
// REQUEST: {"model": "m.gguf", "lora": "a.gguf" | null,
//           "tokenize": ["text", ...],                  token ids of each text, special tokens parsed
//           "generate": [{"prompt": "text", "max_tokens": 16}, ...],  greedy continuations (prompt given
//                                                        with its chat template applied, special tokens parsed)
//           "evaluate": [[ids], ...], "probs_out": "p.f32", "n_vocab": N}   for every position of every sequence, the
//                                                        next-token probabilities (softmax of the logits, no
//                                                        sampling options), float32, [positions, n_vocab] rows
//                                                        in order, appended to probs_out
// The answer: {"tokens": [[ids], ...], "generated": ["text", ...], "warnings": ["...", ...]}
import fs from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const request = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const warnings = [];
const llama = await getLlama({
    gpu: false,
    build: "never",
    logLevel: LlamaLogLevel.warn,
    logger(level, message) {
        if (level === LlamaLogLevel.warn || level === LlamaLogLevel.error) warnings.push(message.trim());
    },
});
const model = await llama.loadModel({ modelPath: request.model });
const out = { tokens: [], generated: [], warnings };
for (const text of request.tokenize ?? []) {
    out.tokens.push(Array.from(model.tokenize(text, true)));
}
if ((request.evaluate ?? []).length) {
    const longest = Math.max(...request.evaluate.map((ids) => ids.length));
    const context = await model.createContext({ contextSize: Math.max(64, longest + 8), threads: request.threads ?? 1 });
    const fd = fs.openSync(request.probs_out, "w");
    const sequence = context.getSequence();
    for (const ids of request.evaluate) {
        await sequence.clearHistory();
        const next = { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } };
        const results = await sequence.controlledEvaluate(ids.map((id) => [id, next]));
        for (const result of results) {
            const probs = result.next.probabilities;
            const row = new Float32Array(request.n_vocab);
            for (const [token, p] of probs) row[token] = p;
            fs.writeSync(fd, Buffer.from(row.buffer));
        }
    }
    sequence.dispose();
    fs.closeSync(fd);
    await context.dispose();
}
if ((request.generate ?? []).length) {
    // one thread: llama.cpp's worker threads spin while they wait for each other, and on a small
    // shared machine (2 cores, a test runner beside it) that makes generation many times slower
    const context = await model.createContext({
        contextSize: 512,
        threads: request.threads ?? 1,
        lora: request.lora ? { adapters: [{ filePath: request.lora, scale: 1 }] } : undefined,
    });
    for (const { prompt, max_tokens } of request.generate) {
        const sequence = context.getSequence();
        const ids = [];
        for await (const token of sequence.evaluate(model.tokenize(prompt, true), { temperature: 0 })) {
            if (model.isEogToken(token) || ids.length >= (max_tokens ?? 16)) break;
            ids.push(token);
        }
        out.generated.push(model.detokenize(ids));
        sequence.dispose();
    }
    await context.dispose();
}
await model.dispose();
process.stdout.write(JSON.stringify(out) + "\n");
