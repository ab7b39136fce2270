# The tabular pipeline as make rules: each stage's outputs depend on its inputs, so `make` re-runs only
# what changed. Usage: make -f scripts/digits.mk [CONFIG=configs/digits.yaml] [RUN=runs/digits-make]
CONFIG ?= configs/digits.yaml
RUN ?= runs/digits-make
BM := bigmodel
ARGS := -c $(CONFIG) --run-dir $(RUN) --quiet

all: $(RUN)/infer/predictions.csv $(RUN)/eval/metrics.json

$(RUN)/prepare/data.safetensors: $(CONFIG) configs/data/digits.csv.gz
	$(BM) prepare $(ARGS)
$(RUN)/init/model.safetensors: $(RUN)/prepare/data.safetensors
	$(BM) init $(ARGS)
$(RUN)/train/best.safetensors: $(RUN)/init/model.safetensors
	$(BM) train $(ARGS)
$(RUN)/eval/metrics.json: $(RUN)/train/best.safetensors
	$(BM) eval $(ARGS)
$(RUN)/export/model.onnx: $(RUN)/train/best.safetensors
	$(BM) export $(ARGS)
$(RUN)/infer/predictions.csv: $(RUN)/export/model.onnx
	$(BM) infer $(ARGS)

.PHONY: all
