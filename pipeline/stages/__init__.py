"""One module per stage: orchestration and artifacts only (`run(ctx)`)."""
