"""Model stage: torchvision's DenseNet121 inflated to 3D, its model files, and the fast forward.

``inflate`` (2D -> 3D), ``model`` (build, save, load, cache per process), ``lean`` (memory-lean
dense blocks and transitions), ``stem`` (the stem in depth slabs), ``features`` (the forward with
``ForwardOptions`` and the pooled hooked layers) and ``options`` (``ForwardOptions``).
"""
