# The README's commands. Each installs what it needs first, once:
#   make demo   the runtime (requirements.txt) + the compiled kernels, then the reference trainer
#   make test   the dev set (requirements-dev.txt) + the compiled kernels, then the test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
RUNTIME := build/.runtime-installed
DEV := build/.dev-installed
KERNELS := build/.kernels-built
SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/include/kdkernels/*.h)

.PHONY: install install-dev demo test bench wheel clean
# pip installs must not run side by side
.NOTPARALLEL:

$(RUNTIME): requirements.txt
	$(PIP) install -r requirements.txt
	mkdir -p build && touch $@

# The dev set includes the runtime, so it marks both as installed.
$(DEV): requirements-dev.txt requirements.txt
	$(PIP) install -r requirements-dev.txt
	mkdir -p build && touch $@ $(RUNTIME)

# -v shows the compiler's progress (one line per file) instead of a silent spinner.
# Rebuilt when a source or the pinned torch changes; installing the dev set later does not rebuild.
$(KERNELS): requirements.txt setup.py pyproject.toml $(SOURCES) | $(RUNTIME)
	$(PIP) install -v --no-build-isolation -e .
	touch $@

install: $(KERNELS)

install-dev: $(DEV) $(KERNELS)

demo: $(KERNELS)
	$(PYTHON) -m kdkernels.train

test: $(DEV) $(KERNELS)
	$(PYTHON) -m pytest -q

bench: $(KERNELS)
	$(PYTHON) -m benchmarks.kd_loss

# A wheel for other machines: every CPU ISA, against the installed torch.
wheel: $(DEV)
	KDKERNELS_CPU_ISAS=all $(PYTHON) -m build --wheel --no-isolation

clean:
	rm -rf build dist kdkernels/*.so *.egg-info
