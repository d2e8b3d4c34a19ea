"""The studies of the lecture notes' claims, each behind a script in `scripts/`: shift equivariance of
convolutions and pooling (`equivariance`), MLP against CNN on shifted digits (`shift_study`), plain against
residual depth (`depth_study`), a fixed filter bank on a photo (`filters`), deep image prior (`image_prior`),
and reading back trained runs for them (`trained`)."""
