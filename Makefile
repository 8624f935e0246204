# The two commands of the README. `make demo` installs and runs the main job on
# built-in defaults; `make test` installs and runs the test suite (what CI runs).
PY ?= python
PIP := $(PY) -m pip

.PHONY: install test-deps demo test bench clean

# torch 2.14.1 is the CUDA 13.0 build matching nvcc 13.0; the extension is built
# against the installed torch, hence --no-build-isolation.
install:
	$(PIP) install "torch==2.14.1" "triton" ninja pybind11 numpy pillow pyyaml matplotlib pytest pytest-benchmark
	$(PIP) install --no-build-isolation -e .

# The main job: APCNet-R18 (fused kernels) vs the FCN-R18 baseline, trained the
# same way on the built-in synthetic scenes, evaluated side by side.
demo: install
	$(PY) -m fastctx.info
	$(PY) -m fastctx compare apcnet_r18-d8_synthetic fcn_r18-d8_synthetic --work-dir work_dirs/demo

# mmsegmentation's own heads are the parity oracle of tests/test_mmseg_parity.py
# (mmcv-lite: no compiled mmcv ops needed; the tests stand in for mmcv.ops).
test-deps:
	$(PIP) install "mmsegmentation==1.2.2" mmengine "mmcv-lite==2.1.0" ftfy regex

test: install test-deps
	$(PY) -m pytest tests

bench: install
	$(PY) -m fastctx bench --memory --plot

clean:
	rm -rf build *.egg-info fastctx/_C*.so work_dirs
