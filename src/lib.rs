//! tuna facade
