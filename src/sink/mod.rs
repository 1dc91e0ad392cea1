//! Where rows go.

pub mod postgres;
