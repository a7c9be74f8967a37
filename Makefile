# The two commands of the README's quick start. Both set the machine up themselves.
.PHONY: demo test unit integration e2e lint bench

demo:
	scripts/bootstrap.sh
	.venv/bin/apmae demo

test:
	scripts/bootstrap.sh
	.venv/bin/python -m pytest -p no:cacheprovider

unit:
	scripts/bootstrap.sh
	.venv/bin/python -m pytest -m unit

integration:
	scripts/bootstrap.sh
	.venv/bin/python -m pytest -m integration

e2e:
	scripts/bootstrap.sh
	.venv/bin/python -m pytest -m e2e

lint:
	.venv/bin/ruff check apmae services tests benchmarks

bench:
	scripts/bootstrap.sh
	for b in benchmarks/*.py; do .venv/bin/python $$b || exit 1; done
