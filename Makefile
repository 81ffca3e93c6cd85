# TokenLake: the two set-up commands are `make demo` and `make test`; both install what is
# missing (Debian packages, via scripts/install-deps.sh) and build first.
JOBS ?= $(shell nproc)
CTEST_ARGS ?=

.PHONY: all deps build demo test asan-test dev bench fuzz format clean

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

FUZZ_SECONDS ?= 20
fuzz: deps
	bash fuzz/run.sh $(FUZZ_SECONDS)

format:
	find src apps tests -name '*.h' -o -name '*.cc' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf build
