//! Errors of the sandbox and task services, with the status codes containerd expects.

/// Result of a sandbox or task operation.
pub type Result<T> = std::result::Result<T, Error>;

/// An error a sandboxer reports to containerd.
///
/// Each kind maps onto the gRPC code (Sandbox API) and ttrpc code (Task API) that
/// containerd turns back into its own error classes, so `NotFound` stays "not found".
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The named sandbox, container or process does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The named sandbox, container or process exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The object is not in a state that allows the operation.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation is not supported by this sandbox family.
    #[error("{0} is not supported")]
    Unimplemented(String),
    /// Anything else. Its message carries the whole chain of causes, so the chain is not
    /// also offered as a source: wrapped again, it would be printed twice.
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for Error {
    fn from(err: anyhow::Error) -> Self {
        Error::Internal(err)
    }
}

impl Error {
    /// Shorthand for an internal error with a message.
    pub fn internal(message: impl std::fmt::Display) -> Self {
        Error::Internal(anyhow::anyhow!("{message}"))
    }
}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Error::Internal(err.into())
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::NotFound(_) => tonic::Status::not_found(message),
            Error::AlreadyExists(_) => tonic::Status::already_exists(message),
            Error::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            Error::FailedPrecondition(_) => tonic::Status::failed_precondition(message),
            Error::Unimplemented(_) => tonic::Status::unimplemented(message),
            Error::Internal(_) => tonic::Status::internal(message),
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(err: Error) -> Self {
        use ttrpc::Code;
        let code = match err {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Internal(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_map_to_grpc_codes() {
        let status: tonic::Status = Error::NotFound("sandbox \"a\"".into()).into();
        assert_eq!(status.code(), tonic::Code::NotFound);
        assert_eq!(status.message(), "sandbox \"a\" not found");

        let status: tonic::Status = Error::InvalidArgument("bad id".into()).into();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        let status: tonic::Status = Error::AlreadyExists("sandbox \"a\"".into()).into();
        assert_eq!(status.code(), tonic::Code::AlreadyExists);
    }

    #[test]
    fn internal_errors_keep_their_causes() {
        let err = Error::from(anyhow::anyhow!("disk full").context("write config"));
        assert_eq!(err.to_string(), "write config: disk full");
        let wrapped = anyhow::Error::new(err).context("start sandbox \"p\"");
        assert_eq!(
            format!("{wrapped:#}"),
            "start sandbox \"p\": write config: disk full"
        );
    }

    #[test]
    fn kinds_map_to_ttrpc_codes() {
        match ttrpc::Error::from(Error::NotFound("container \"c\"".into())) {
            ttrpc::Error::RpcStatus(status) => {
                assert_eq!(status.code(), ttrpc::Code::NOT_FOUND);
                assert_eq!(status.message(), "container \"c\" not found");
            }
            other => panic!("unexpected error {other:?}"),
        }
    }
}
