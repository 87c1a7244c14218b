"""``qfine studio``: a local web app over the runs root — runs and live curves, launch, stop and
resume, chat, merge and export — that starts ``qfine`` commands as processes and reads their run
directories (docs/studio.md)."""
