//! Shipping: batches of spooled records into the audit table over the audit role's own
//! connection, idempotent on the event key. (To be written.)
