//! The sans-I/O router core (being written).
