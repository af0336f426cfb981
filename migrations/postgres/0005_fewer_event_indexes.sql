-- Every index is one more page for each commit to write (issue 18; the
-- SQLite schema's 0008 says more): the event log keeps the two lookups
-- that are rare in a big log, a tenant's events and a kind's; a node's or
-- a workload's are frequent enough to find by reading back from the
-- newest, and the trim finds old events by id, the log's order.
DROP INDEX events_by_at;
DROP INDEX events_by_workload;
DROP INDEX events_by_node;
