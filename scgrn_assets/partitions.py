"""One partition per catalog study. Static, so partitioned schedules and backfills work."""

import dagster as dg

from scgrn_assets.settings import current_catalog

study_partitions = dg.StaticPartitionsDefinition(current_catalog().accessions)
