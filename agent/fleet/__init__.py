"""Fleet collection: one Hive-partitioned dataset for every host.

    ROOT/table=<table>/date=YYYY-MM-DD/host=<hostname>/<run_id>.parquet
    ROOT/manifests/date=YYYY-MM-DD/host=<hostname>/<run_id>.json    (written last per run)
    ROOT/extras/date=YYYY-MM-DD/host=<hostname>/<run_id>/<file>      (pcap, svg ...)

A run is audited into a local bundle in the spool, laid out there as the objects it will become
(`layout`), then published to the store (`spool`), local directory or S3 (`stores`). Object keys
are a pure function of the run, so publishing again after a crash rewrites the same objects and
can never duplicate rows.
"""
