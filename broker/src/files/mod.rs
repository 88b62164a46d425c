//! Files (PROTOCOL.md section 12): resumable uploads, downloads and the checks made on
//! their bytes. `sniff` judges a declared content type against the first bytes;
//! `thumbnail` makes bounded PNG thumbnails of images.

pub(crate) mod sniff;
pub(crate) mod thumbnail;
