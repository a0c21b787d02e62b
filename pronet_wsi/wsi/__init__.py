"""The run layer: whole slides through the science modules, on threads or a Dask cluster.

plan       SegmentConfig, SlidePlan (frozen: slide, overview, grid, tiles to run, model, outputs), SlideResult
pipeline   prepare_slide -> SlidePlan -> executor(plan, ...) -> finish_slide; segment_slide(..., executor=...);
           the thread-pool tile executor
tile_task  one batch of tiles: read -> model (a TileModel) -> post-process -> candidates -> the tile store
tile_store the per-tile parts of an unfinished run on disk (CRC-checked, resumable)
assemble   stitch the stored tiles and stream GeoJSON / labels / overlay
cluster    the Dask executor, ModelSpec for workers, several slides in flight
cohort     many slides: inputs, manifests, shards, failure records, the cohort summary
"""
