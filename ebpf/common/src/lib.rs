//! Types shared between the incfs probe (kernel side) and the recorder (userspace).
#![no_std]
