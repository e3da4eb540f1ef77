"""PICT chaos experiments: steady state, hypothesis, bounded faults, a gate verdict.

`agent.chaos.faults` holds one injector per fault kind; the runner, journal and watchdog that
drive them live beside it.
"""
