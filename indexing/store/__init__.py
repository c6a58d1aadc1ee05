"""Where everything lives: fsspec I/O, the name of every output location, claiming an output, the index
manifest. Both stages (indexing and search) and the jobs import it; it imports neither."""
