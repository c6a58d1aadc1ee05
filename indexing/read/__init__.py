"""Reading inputs: shard lists, samples out of webdataset tars and image folders, originals re-fetched by key,
image mode handling."""
