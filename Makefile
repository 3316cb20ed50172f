# asteria — the two commands a user needs:
#   make demo   installs what is missing, builds asteria and runs the asteria-train comparison
#   make test   installs what is missing, builds once, and runs every C++ and Python test
# Everything lands in .venv/ and build/ inside the checkout.

PYTHON        ?= python3
VENV          := .venv
PY            := $(VENV)/bin/python
PIP           := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION ?= 2.13.0
BUILD_DIR     := build/py
TSAN_DIR      := build/tsan
ASAN_DIR      := build/asan
CUDA_DIR      := build/cuda
FUZZ_DIR      := build/fuzz
FUZZ_SECONDS  ?= 30
WHEEL_DIR     := build/wheel
JOBS          ?= $(shell nproc 2>/dev/null || echo 2)
STAGE         := scripts/stage
CMAKE         := $(VENV)/bin/cmake
CTEST         := $(VENV)/bin/ctest
APT_PACKAGES  := g++ libgtest-dev libbenchmark-dev liburing-dev ccache pkg-config clang libclang-rt-14-dev
NVCC          := $(shell command -v nvcc 2>/dev/null || { test -x /usr/local/cuda/bin/nvcc && echo /usr/local/cuda/bin/nvcc; })

.PHONY: all demo test stage-reset deps venv build ctest tsan asan fuzz cuda-check pytest wheel-check bench clean help
all: build

help:
	@echo "make demo   - build and run the asteria-train comparison on the embedded corpus"
	@echo "make test   - build once and run all tests (ctest, TSan and ASan/UBSan ctest, fuzzing, CUDA compile check, pytest, wheel check)"
	@echo "make fuzz   - build the libFuzzer harnesses of the checkpoint format and run them for FUZZ_SECONDS (default 30) in total"
	@echo "make bench  - run the microbenchmarks and asteria-bench (slow)"

# Debian packages: installed when missing and we are root (CI and fresh machines); otherwise
# we say what is missing and carry on (C++ unit tests are then skipped by CMake with a message).
deps:
	@$(STAGE) deps -- scripts/install-deps $(APT_PACKAGES)

$(VENV)/.ready: pyproject.toml scripts/make-venv
	@$(STAGE) venv -- scripts/make-venv $(PYTHON) $(VENV) $(TORCH_VERSION)
	@touch $@

venv: $(VENV)/.ready

# One build: the editable install compiles asteria._core, the C++ unit tests and the benchmarks
# into $(BUILD_DIR); ctest runs from there. ccache makes rebuilds and the other builds cheap.
build: deps venv
	@$(STAGE) build -- $(PIP) install --no-build-isolation --no-deps -q -e . \
	    -Cbuild-dir=$(BUILD_DIR) \
	    -Ccmake.define.ASTERIA_BUILD_TESTS=ON \
	    -Ccmake.define.ASTERIA_BUILD_BENCHMARKS=ON

ctest: build
	@$(STAGE) ctest -- $(CTEST) --test-dir $(BUILD_DIR) -LE bench -j$(JOBS) --output-on-failure

# ThreadSanitizer build of the C++ core tests (queue, scheduler and pager; the core only, no Python).
tsan: deps venv
	@$(STAGE) tsan-build -- sh -c '$(CMAKE) -S . -B $(TSAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DASTERIA_USE_TSAN=ON -DASTERIA_BUILD_TESTS=ON -DASTERIA_BUILD_PYTHON=OFF \
	    -DPython_EXECUTABLE=$(CURDIR)/$(PY) >/dev/null && $(CMAKE) --build $(TSAN_DIR) --target mpmc_queue_test scheduler_test pager_test host_memory_test'
	@$(STAGE) tsan-test -- env TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
	    $(CTEST) --test-dir $(TSAN_DIR) -R "MpmcQueue|Scheduler|Pager|PinnedPool|DeferredCopy|CopyQueue" -j$(JOBS) --output-on-failure

# AddressSanitizer + UndefinedBehaviorSanitizer build of every C++ core test.
asan: deps venv
	@$(STAGE) asan-build -- sh -c '$(CMAKE) -S . -B $(ASAN_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DASTERIA_USE_ASAN=ON -DASTERIA_BUILD_TESTS=ON -DASTERIA_BUILD_PYTHON=OFF \
	    -DPython_EXECUTABLE=$(CURDIR)/$(PY) >/dev/null && $(CMAKE) --build $(ASAN_DIR)'
	@$(STAGE) asan-test -- env ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
	    $(CTEST) --test-dir $(ASAN_DIR) -LE bench -j$(JOBS) --output-on-failure

# libFuzzer harnesses (clang, with ASan and UBSan) of everything that parses checkpoint bytes from
# disk: the header parser and the reader. Built in $(FUZZ_DIR) from the pure sources only; run for
# FUZZ_SECONDS in total on a scratch copy of the seed corpus in cpp/fuzz/corpus (never modified).
# Crashing inputs land in $(FUZZ_DIR)/artifacts/. clang is looked up when the recipe runs, after deps.
fuzz: deps venv
	@if ! command -v clang++ >/dev/null 2>&1; then \
	    echo "== [fuzz] skipped: clang++ not found (apt-get install clang libclang-rt-14-dev), the fuzzers were not built"; \
	else \
	    $(STAGE) fuzz-build -- sh -c '$(CMAKE) -S . -B $(FUZZ_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	        -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
	        -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_BUILD_TYPE=RelWithDebInfo -DASTERIA_BUILD_FUZZERS=ON \
	        -DASTERIA_BUILD_TESTS=OFF -DASTERIA_BUILD_PYTHON=OFF -DPython_EXECUTABLE=$(CURDIR)/$(PY) >/dev/null \
	        && $(CMAKE) --build $(FUZZ_DIR) --target fuzzers' \
	    && $(STAGE) fuzz-run -- cpp/fuzz/run.sh $(FUZZ_DIR) $(FUZZ_SECONDS); \
	fi

# Compile-only check of the CUDA backend: the cuSOLVER engine, asteria._core and cuda_test are built
# with nvcc in $(CUDA_DIR) (cuSOLVER/cuBLAS from the NVIDIA wheels, installed into the venv when
# missing); nothing runs. scripts/gpu-check builds and runs the GPU tests on a machine with a GPU.
cuda-check: deps venv
ifeq ($(NVCC),)
	@echo "== [cuda-check] skipped: nvcc not found (no CUDA toolkit), the CUDA backend was not compiled"
else
	@$(STAGE) cuda-deps -- scripts/cuda-deps $(PY)
	@$(STAGE) cuda-build -- sh -c '$(CMAKE) -S . -B $(CUDA_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(CURDIR)/$(VENV)/bin/ninja \
	    -DCMAKE_CUDA_COMPILER=$(NVCC) -DASTERIA_ENABLE_CUDA=ON -DASTERIA_BUILD_TESTS=ON -DASTERIA_BUILD_PYTHON=ON \
	    -DPython_EXECUTABLE=$(CURDIR)/$(PY) >/dev/null && $(CMAKE) --build $(CUDA_DIR)'
	@echo "cuda-check: the CUDA backend, asteria._core and cuda_test compiled; the GPU tests were not run" \
	    "(this stage has no GPU: run scripts/gpu-check on a GPU machine)"
endif

# The tests that send signals run apart, with SIGINT ignored as a background job or nohup has it: they must set
# the dispositions they rely on themselves, however make test is started.
pytest: build
	@$(STAGE) pytest -- $(PY) -m pytest -q -m "not signals" tests
	@$(STAGE) pytest-signals -- sh -c 'trap "" INT; exec $(PY) -m pytest -q -m signals tests'

# The wheel installs and imports in a fresh virtualenv away from the build tree.
wheel-check: deps venv
	@$(STAGE) wheel-check -- scripts/wheel-check $(PY) $(WHEEL_DIR) $(TORCH_VERSION)

test: stage-reset deps venv build ctest tsan asan fuzz cuda-check pytest wheel-check
	@$(STAGE) --summary

# A run that failed left its stage times behind: the summary of this run starts empty.
stage-reset:
	@$(STAGE) --reset

demo: deps venv build
	@$(STAGE) demo -- $(VENV)/bin/asteria-train

bench: build
	$(CTEST) --test-dir $(BUILD_DIR) -L bench --output-on-failure
	$(VENV)/bin/asteria-bench linalg
	$(VENV)/bin/asteria-bench optimizer

clean:
	rm -rf build dist $(VENV)
