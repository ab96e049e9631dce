"""MatrixVT / BEVDepth camera-only 3D detection on nuScenes (native PyTorch port).

Packages form layers; each imports only the packages it sits on ("and below": everything those sit on too),
checked by tests/test_package_layers.py for top-level and function-local imports:

    utils, configs    the bottom: import no other bevdepth package
    ops               on utils, configs
    layers            on ops and below
    models            on layers and below
    datasets          on utils, configs
    evaluators        on datasets and below
    callbacks         on utils, configs
    deploy            on models, evaluators and below
    engine            on models, evaluators, callbacks and below
"""

__version__ = "0.1.0"
