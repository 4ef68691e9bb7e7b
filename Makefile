# The README's commands. `make demo` and `make test` install what they need first.
PYTHON ?= python3
STAMP := build/.installed

.PHONY: install demo test bench clean

$(STAMP): setup.py pyproject.toml requirements-dev.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/include/kdkernels/*.h)
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-build-isolation -e .
	mkdir -p build && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m kdkernels.train

test: $(STAMP)
	$(PYTHON) -m pytest -q

bench: $(STAMP)
	$(PYTHON) -m benchmarks.kd_loss

clean:
	rm -rf build kdkernels/*.so *.egg-info
