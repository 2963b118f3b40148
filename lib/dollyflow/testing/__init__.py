"""Helpers for tests, benches and the quickstart, never imported by the jobs: a tiny Dolly model
trained in seconds (:mod:`.fixtures`), generated sample records (:mod:`.samples`) and the
pair-level score of a deduplication against make_corpus's ground truth (:mod:`.dedupe_scoring`).
Shipped in the wheel, like ``torch.testing``: the quickstart generates its sample with it where
``../shared`` is absent."""
