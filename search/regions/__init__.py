"""Partial copies at scan time: query windows searched against the region index, aggregated per image.

Every query is cut into windows (``copyscan.indexing.models.regions``: the whole image plus a grid of smaller
boxes, cropped from the query preprocessed at the index's ``query_size`` and embedded like images). Each
window is searched in the region index (``RegionSearcher``: the training images' region vectors, exact
re-ranking like the global index), each hit is score-normalised against the region index's own background
sample, and the hits of one query are aggregated per training image: its ``local_score`` is the best (window,
region) pair by normalised score, which also gives ``query_box`` and ``train_box``.

Localise, then search (``refine``): a (window, region) pair also says where the whole training image would
lie in the query if the window's content is that region of it (same scale along each axis, ``frames``).
The median of that estimate over an image's best ``REFINE_PAIRS`` pairs is its *frame*; the frames of the
best ``ScanConfig.region_refine`` images are cut from the query, embedded like whole images and searched
in the global index (``crop_boxes`` / ``merge_crops``). A pasted object cut out this way matches its
source like a whole copy does, and that search is not limited to the images region matching found; an
image's best crop score adds to its region score.

Sliding windows (``slide``, ``ScanConfig.region_slide``) are crops too, made without region matching:
squares or rectangles of the query (sides in fractions of its shorter side, ``slide_boxes``),
``SLIDE_STEP`` of a side apart, searched in the global index with the frames. They find pasted objects
whose source region matching ranked too low to get a frame, but bring about as many false matches (off by
default; README).

Modules: ``geometry`` (frames, sliding windows, IoU), ``result`` (``LocalResult``: aggregation per image,
crops, merging the crops' hits), ``searcher`` (the region index and its searcher), ``windows``
(``LocalWindows``: region matching in a scan, set up by ``local_windows``).
"""
