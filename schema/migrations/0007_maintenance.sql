-- aiservice 0007: maintenance any process may run.
--
-- aiservice.maintain() (schema/functions/maintain.sql) expires leases, purges past
-- retention and folds counters. The API and worker processes all call it on a timer;
-- this row records when a pass last ran so that many replicas do the work once per
-- interval between them, not once each.

CREATE TABLE aiservice.maintenance (
    only_row    boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    last_run_at timestamptz
);

INSERT INTO aiservice.maintenance DEFAULT VALUES;
