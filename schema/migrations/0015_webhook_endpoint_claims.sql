-- aiservice 0015: webhook deliveries are claimed per endpoint (claim_deliveries_v2 in
-- schema/functions/delivery.sql takes each endpoint's oldest due deliveries up to its free slots),
-- so a slow receiver holds only its own share of a sender's slots.

CREATE INDEX webhook_deliveries_owner_due_idx
    ON aiservice.webhook_deliveries (owner_service, next_attempt_at) WHERE status = 'pending';
