# pyllama: every target is a one-liner over pip, pytest or pyllama itself.
PYTHON ?= python3
SHARED ?= $(or $(PYLLAMA_SHARED),../shared)
PIP := $(PYTHON) -m pip install --quiet --disable-pip-version-check

.PHONY: install demo test bench man clean

install:            ## build the C core for this CPU and install pyllama (editable) with test deps
	$(PIP) -e '.[test]'

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

bench: install      ## speed: tokens/s on synthetic stories15M/110M shapes and stories260K
	PYLLAMA_SHARED=$(SHARED) $(PYTHON) benchmarks/bench.py

man: install        ## the man page pyllama.1, from the argparse parser
	$(PIP) 'argparse-manpage>=4'
	argparse-manpage --module pyllama.cli --function get_parser --project-name pyllama \
	  --prog pyllama --version "$$($(PYTHON) -c 'import pyllama; print(pyllama.__version__)')" \
	  --description "Llama-2-family inference on the CPU" --output pyllama.1
	@echo "wrote pyllama.1 (view: man ./pyllama.1)"

clean:
	rm -rf build dist *.egg-info pyllama/_core*.so pyllama/_core.c pyllama.1 .pytest_cache
