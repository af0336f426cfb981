-- Where each agent keeps container directories, so claims can name the
-- host paths of a container's volumes.
ALTER TABLE nodes ADD COLUMN state_root TEXT NOT NULL DEFAULT '';
