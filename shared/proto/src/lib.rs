//! Generated code for Penny's v1 API, used by clients and servers alike. No logic here:
//! keep it slim.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// The encoded `FileDescriptorSet` of every Penny proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("penny_descriptor");

/// The google.rpc error details Penny's statuses carry, for server reflection (so grpcurl
/// prints them decoded). Descriptors only: the Rust types are tonic-types'.
pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("error_details_descriptor");

/// `penny.common.v1`.
pub mod common {
    pub mod v1 {
        tonic::include_proto!("penny.common.v1");
    }
}

/// `penny.auth.v1`.
pub mod auth {
    pub mod v1 {
        tonic::include_proto!("penny.auth.v1");
    }
}

/// `penny.keys.v1`.
pub mod keys {
    pub mod v1 {
        tonic::include_proto!("penny.keys.v1");
    }
}

/// `penny.authz.v1`.
pub mod authz {
    pub mod v1 {
        tonic::include_proto!("penny.authz.v1");
    }
}

/// `penny.audit.v1`.
pub mod audit {
    pub mod v1 {
        tonic::include_proto!("penny.audit.v1");
    }
}

/// `penny.files.v1`.
pub mod files {
    pub mod v1 {
        tonic::include_proto!("penny.files.v1");
    }
}

/// `penny.tenants.v1`.
pub mod tenants {
    pub mod v1 {
        tonic::include_proto!("penny.tenants.v1");
    }
}
