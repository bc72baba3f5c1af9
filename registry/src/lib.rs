//! The trust model (certificates, prefixes, network config, CRL, signed peer records) and the registry server and client. Filled by issue 3; empty until then.
