//! The local spool: segmented append-only files where every audit event is written before it
//! is shipped, and removed only after the batch that carried it committed. (To be written.)
