-- Retention of ended claims (issue 18): the trim finds them by when they
-- ended without reading the active ones.
CREATE INDEX claims_ended ON claims (released_at) WHERE status <> 'active';
CREATE INDEX sync_status_by_age ON sync_status (updated_at);
CREATE INDEX boosts_ended ON boosts (ended_at) WHERE status IN ('released', 'expired', 'preempted', 'failed');
