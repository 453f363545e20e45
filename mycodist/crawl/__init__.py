"""The crawler: site adapters find photo URLs and species facts, a polite fetcher downloads them,
a process pool validates and re-encodes them, and the shard writer stores them; a SQLite ledger
under `OUT/.crawl/` makes every run resumable at sample level (docs/crawling.md)."""
