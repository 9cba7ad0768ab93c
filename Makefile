# Developer entry points. The end-to-end tests drive a real containerd and need root.

CARGO ?= cargo

.PHONY: all setup build test lint fmt clean

all: build

setup:
	bash scripts/setup.sh

build:
	$(CARGO) build --workspace --all-targets

# The sandboxer binary is built first: the end-to-end tests start it as a separate process.
test: setup
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
