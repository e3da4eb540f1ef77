"""The read-only half of kernel tuning: profiles (TOML data, validated) and the plan that
compares them with a host (current -> target, why, risk, source).

Why here and not in agent/tuning: the `kernel` probe audits a host against a profile, and probes
import nothing of agent/ (tests/test_layers.py). Planning only reads /proc and /sys, so it sits
beside the probes; agent/tuning keeps what changes the host (the engine, its journal, the PM QoS
holder) and builds on this package.
"""
