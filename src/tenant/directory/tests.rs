//! Unit tests of the pure parts: cache freshness and staleness, flights, invalidation
//! epochs, row → target resolution, config validation.
