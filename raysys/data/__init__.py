"""The data layer: read a partner's table, check partners agree, decide which rows each step uses.

`raysys.data.demo` (scikit-learn digits split across partners) is imported on its own by the CLI;
workers never need it.
"""

from raysys.data.sampler import partner_batch_sizes, partner_epoch, split_indices, step_indices
from raysys.data.sources import (
    DataError,
    PartnerTable,
    TableSchema,
    check_schema_agreement,
    load_partner_table,
)

__all__ = [
    "DataError",
    "PartnerTable",
    "TableSchema",
    "check_schema_agreement",
    "load_partner_table",
    "partner_batch_sizes",
    "partner_epoch",
    "split_indices",
    "step_indices",
]
