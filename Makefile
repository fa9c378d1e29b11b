# The two README commands: `make run` (the main job) and `make test` (the test suite).
# Both create .venv/ on first use; later calls reuse it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
OUT    ?= outputs
# CPU wheel of torch (a plain `torch` could pull a multi-GB CUDA build). GPU: see `install-gpu`.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
# setuptools reports every editable install ("Editable installation ... be careful with folders named
# like your package"): informational only, so it is silenced here.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: install install-gpu run test notebooks benchmark lab clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" $(TORCH_INDEX)
	$(EDITABLE) $(PY) -m pip install --quiet -e ".[dev,cpu]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

install: $(VENV)/.installed

# GPU machines: a CUDA torch and onnxruntime-gpu instead of onnxruntime (never both).
install-gpu:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch $(TORCH_INDEX)
	$(EDITABLE) $(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip uninstall --quiet -y onnxruntime
	$(PY) -m pip install --quiet "onnxruntime-gpu>=1.16"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(VENV)/.installed

# Main job: execute every notebook headless on the bundled defaults into $(OUT)/.
run: install
	$(PY) -m instantid_lab.notebooks --out $(OUT)

test: install
	$(PY) -m pytest -q

benchmark: install
	$(PY) benchmarks/face_analysis.py
	$(PY) benchmarks/pipeline_step_time.py
	$(PY) benchmarks/batched_grid.py
	$(PY) benchmarks/miniature_sampling.py
	$(PY) benchmarks/gpu_sdxl.py

lab: install
	$(VENV)/bin/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root,)

clean:
	rm -rf $(VENV) $(OUT) notebooks/outputs  # notebooks/outputs: where notebook 06 wrote its retrain before
