-- Whether the tenant's files were restored into a claim's container when
-- it was claimed, so that every view of the claim (the Claim answer,
-- GetClaim, ListClaims, bh claims list) says *_WITH_DATA alike (issue 15).
ALTER TABLE claims ADD COLUMN restored INTEGER NOT NULL DEFAULT 0;
