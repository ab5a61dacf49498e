# pyllama: every target is a one-liner over pip, pytest or pyllama itself.
PYTHON ?= python3
SHARED ?= $(or $(PYLLAMA_SHARED),../shared)
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench bench-contention bench-compare bench-big bench-serve bench-avx2 man clean

install:            ## build the C core for this CPU and install pyllama (editable) with test, server and ray deps
	$(PIP) -e '.[test,server,ray]'

demo: install       ## generate a story with the best model found
	@if [ -f stories15M.bin ]; then \
	  $(PYTHON) -m pyllama run stories15M.bin -z $(or $(wildcard tokenizer.bin),$(SHARED)/models/tokenizer.bin) -t 0.8 -n 256 -i "Once upon a time"; \
	elif [ -f $(SHARED)/models/stories260K.bin ]; then \
	  $(PYTHON) -m pyllama run $(SHARED)/models/stories260K.bin -z $(SHARED)/models/tok512.bin -t 0.8 -s 42 -n 256 -i "Once upon a time"; \
	else \
	  echo "No model found. Download llama2.c's stories15M (60 MB) and run make demo again:"; \
	  echo "  wget https://huggingface.co/karpathy/tinyllamas/resolve/main/stories15M.bin"; exit 1; \
	fi

test: install       ## the whole test suite (parity with llama2.c and llama.cpp on $(SHARED)/golden)
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) -m pytest -q

bench: install      ## speed: tokens/s on synthetic stories15M/110M shapes and stories260K, then 1/2/4 processes at once
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/bench.py

bench-contention: install  ## only the contention rows of make bench: 1, 2 and 4 processes generating at once
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/bench.py --contention

bench-compare: install  ## pyllama vs llama-cpp-python on the same GGUF files (pip install -e '.[bench]' first)
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/compare.py $(if $(LLAMA_PYTHON),--llama-python $(LLAMA_PYTHON))

bench-serve: install  ## `pyllama serve`: aggregate tokens/s of 1, 2, 4, 8 streaming HTTP clients (15M, 110M, 1B Q8_0 shapes); LLAMA_SERVER=path/to/llama-server: side by side
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/serve_clients.py --model stories15M,stories110M --repeat 2 $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/serve_clients.py --model llama3-1b --gen 64 --repeat 2 $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

bench-avx2: install  ## the AVX2-only path: an AVX2-only core (build/avx2) against LLAMA_BENCH=llama.cpp's llama-bench built for AVX2 alone
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/avx2.py $(if $(LLAMA_BENCH),--llama-bench $(LLAMA_BENCH))

bench-big: install  ## only the Llama-3.2-1B-shaped rows of make bench (makes the files on first use, ~8 GB), then side by side
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/bench.py --big
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/compare.py --big --rounds 2 $(if $(LLAMA_PYTHON),--llama-python $(LLAMA_PYTHON))
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/compare.py --big --prompt 512 --gen 16 $(if $(LLAMA_PYTHON),--llama-python $(LLAMA_PYTHON))

man: install        ## the man page pyllama.1, from the argparse parser
	$(PIP) 'argparse-manpage>=4'
	argparse-manpage --module pyllama.cli --function get_parser --project-name pyllama \
	  --prog pyllama --version "$$($(PYTHON) -c 'import pyllama; print(pyllama.__version__)')" \
	  --description "Llama-2-family inference on the CPU" --output pyllama.1
	@echo "wrote pyllama.1 (view: man ./pyllama.1)"

clean:
	rm -rf build dist *.egg-info pyllama/_core*.so pyllama/_core.c pyllama.1 .pytest_cache

# -- fuzzing and sanitizers (README: "Fuzzing and sanitizers") ----------------------------------
.PHONY: fuzz asan
FUZZ_COUNT ?= 100000
FUZZ_SEED ?=
FUZZ_OUT ?= build/fuzz
ASAN_CC ?= gcc
ASAN_TREE ?= build/asan
ASAN_TESTS ?= tests
ASAN_CFLAGS := -O1 -g -fsanitize=address,undefined -fno-omit-frame-pointer
ASAN_LDFLAGS := -fsanitize=address,undefined
# an uninstrumented python loading an instrumented extension: the ASan runtime must come first;
# python's own allocations are not leaks worth reporting; any UBSan report fails the run
ASAN_ENV = LD_PRELOAD="$$($(ASAN_CC) -print-file-name=libasan.so)" \
  ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 PYTHONPATH="$(CURDIR)/$(ASAN_TREE)"

fuzz: install       ## long fuzz run of the file readers: FUZZ_COUNT=100000, FUZZ_SEED=random (printed)
	$(PYTHON) tests/fuzz/fuzz_models.py --count $(FUZZ_COUNT) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED)) --out $(FUZZ_OUT) --progress 10000

asan:               ## the tests (ASAN_TESTS) on an ASan+UBSan core built in build/asan; the install is untouched
	rm -rf $(ASAN_TREE) && $(PYTHON) -c "import shutil; shutil.copytree('.', '$(ASAN_TREE)', ignore=shutil.ignore_patterns('build', 'dist', '.git', '.venv', '__pycache__', '*.egg-info', '.pytest_cache', '.hypothesis', '*.so', '*.o', '_core.c', '*.bin', '*.gguf', 'models', 'bench-models'))"
	cd $(ASAN_TREE) && CC=$(ASAN_CC) PYLLAMA_CFLAGS="$(ASAN_CFLAGS)" PYLLAMA_LDFLAGS="$(ASAN_LDFLAGS)" $(PYTHON) -c "import build_ffi; build_ffi.ffibuilder.compile(tmpdir='.')" >/dev/null
	cd $(ASAN_TREE) && $(ASAN_ENV) PYLLAMA_SHARED=$(abspath $(SHARED)) $(PYTHON) -c "import pyllama; f = pyllama._core.__file__; assert f.startswith('$(CURDIR)/$(ASAN_TREE)/') and b'__asan_init' in open(f, 'rb').read(), f; print('ASan+UBSan core:', f)"
	cd $(ASAN_TREE) && $(ASAN_ENV) PYLLAMA_SHARED=$(abspath $(SHARED)) $(PYTHON) -m pytest -q -p no:cacheprovider $(ASAN_TESTS)
