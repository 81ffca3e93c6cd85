# TokenLake: the two set-up commands are `make demo` and `make test`; both install what is
# missing (Debian packages, via scripts/install-deps.sh) and build first.
JOBS ?= $(shell nproc)
CTEST_ARGS ?=

.PHONY: all deps build demo test asan-test dev bench fuzz cuda check format clean

all: build

deps:
	@bash scripts/install-deps.sh

build: deps
	cmake --preset release
	cmake --build --preset release -j $(JOBS)

demo: build
	./build/release/bin/tokenlake sim

test: build
	ctest --preset release -j $(JOBS) $(CTEST_ARGS)

asan-test: deps
	cmake --preset asan
	cmake --build --preset asan -j $(JOBS)
	ctest --preset asan -j $(JOBS) $(CTEST_ARGS)

dev: deps
	cmake --preset dev
	cmake --build --preset dev -j $(JOBS)

bench: build
	./build/release/bin/tokenlake bench control-plane --json build/release/control_plane.json

# The CUDA data plane (sm_90a): builds the kernels, their tests, the GPU benchmarks and the CLI
# with its GPU paths (`generate --device gpu`, `profile`) with nvcc, runs the tests, which skip
# themselves where no GPU is present, and the CLI's contract checks on that CLI (its GPU error
# paths included). Needs /usr/local/cuda. On a machine with an NVIDIA GPU: bench/gpu_session.sh.
NVCC ?= /usr/local/cuda/bin/nvcc
cuda: deps
	@test -x $(NVCC) || { echo "make cuda: $(NVCC) not found (CUDA 13 is expected under /usr/local/cuda)"; exit 1; }
	cmake --preset cuda -DTOKENLAKE_BUILD_BENCHMARKS=OFF
	cmake --build --preset cuda -j $(JOBS) --target tokenlake_attention_cuda tokenlake_store_cuda \
	  paged_attention_test device_arena_test peer_arena_test tokenlake_transport_nccl \
	  nccl_channel_test nccl_attention_test tokenlake_engine_cuda gpu_engine_test device_pool_test \
	  gpu_engine_fixture_test gpu_attention_bench gpu_merge_bench gpu_stream_probe gpu_engine_timing \
	  tokenlake
	ctest --test-dir build/cuda -L gpu --output-on-failure
	apps/tokenlake/cli_test.sh build/cuda/bin/tokenlake

FUZZ_SECONDS ?= 20
fuzz: deps
	bash fuzz/run.sh $(FUZZ_SECONDS)

# Style and safety checks with clang 14 (scripts/check.sh says what each does): formatting of the
# tracked sources, the thread-safety analysis over every translation unit, clang-tidy on the lines
# changed since origin/main (or HEAD~1; TIDY_BASE=REF to choose).
TIDY_BASE ?=
check: deps
	JOBS=$(JOBS) bash scripts/check.sh all $(TIDY_BASE)

# Formats the tracked sources in place (what `make check` asks for).
format:
	git ls-files -- '*.h' '*.cc' '*.cu' '*.cuh' | xargs clang-format-14 -i

clean:
	rm -rf build
