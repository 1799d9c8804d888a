"""Run records and what is made of them: aggregation, tables, plots."""

from lorafactory.results.record import RECORD_NAME, RunRecord, read_record, write_record

__all__ = ["RECORD_NAME", "RunRecord", "read_record", "write_record"]
