-- Conditional pool writes (issue 12).
--
-- revision: the row version every committed change bumps. A change states
-- the revision, state, tenant and claim generation it expects to replace
-- (UPDATE ... WHERE ...), so a writer that decided on a stale view gets a
-- conflict instead of overwriting what happened meanwhile.
ALTER TABLE containers ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;

-- A warming container never holds a tenant any more: a cold start claims
-- its container only once it is ready. Rows from before are interrupted
-- cold starts whose claim was never acknowledged.
UPDATE containers SET tenant_id = NULL WHERE state = 'warming';
