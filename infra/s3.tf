# Two product buckets, alike but for their lifecycle:
#   data:   the landing layout (BACKORDER_LANDING_ROOT): incoming batches, predictions, rejects,
#           reports, manifests. Old objects move to STANDARD_IA; they are read rarely once scored.
#   mlflow: MLflow run artifacts and registered models (BACKORDER_ARTIFACT_LOCATION). Current
#           objects stay in STANDARD: any model version may be loaded as champion again.
# Encryption is SSE-KMS with the product's key (see kms.tf for why not AES256); bucket keys cut
# the KMS requests (and cost) of s3fs's many small reads to one per object per bucket key lease.
locals {
  product_buckets = {
    data = {
      name                   = "${local.bucket_prefix}-data"
      infrequent_access_days = var.data_infrequent_access_days
    }
    mlflow = {
      name                   = "${local.bucket_prefix}-mlflow"
      infrequent_access_days = null
    }
  }
  # The release workflow's compose stacks, releases/<tag>/stack.tar.gz in the data bucket: the
  # deploy role writes them, the instance reads them (by name, so policies are known at plan).
  release_prefix      = "releases/"
  release_stacks_arns = ["arn:${local.partition}:s3:::${local.product_buckets.data.name}/${local.release_prefix}*"]
}

resource "aws_s3_bucket" "product" {
  #checkov:skip=CKV_AWS_144:Single-region product; versioning plus noncurrent-version retention is the recovery path. Replicate when a second region is required.
  #checkov:skip=CKV2_AWS_62:Nothing consumes bucket events: the pipelines poll the landing layout (Airflow DAGs, score-pending).
  for_each = local.product_buckets

  bucket = each.value.name
}

resource "aws_s3_bucket_ownership_controls" "product" {
  for_each = local.product_buckets

  bucket = aws_s3_bucket.product[each.key].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "product" {
  for_each = local.product_buckets

  bucket                  = aws_s3_bucket.product[each.key].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "product" {
  for_each = local.product_buckets

  bucket = aws_s3_bucket.product[each.key].id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "product" {
  for_each = local.product_buckets

  bucket = aws_s3_bucket.product[each.key].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm     = "aws:kms"
      kms_master_key_id = aws_kms_key.main.arn
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_logging" "product" {
  for_each = local.product_buckets

  bucket        = aws_s3_bucket.product[each.key].id
  target_bucket = aws_s3_bucket.access_logs.id
  target_prefix = "${each.key}/"
}

resource "aws_s3_bucket_lifecycle_configuration" "product" {
  for_each = local.product_buckets

  bucket = aws_s3_bucket.product[each.key].id

  rule {
    id     = "noncurrent-versions-and-incomplete-uploads"
    status = "Enabled"
    filter {}

    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  dynamic "rule" {
    for_each = each.value.infrequent_access_days == null ? [] : [each.value.infrequent_access_days]
    content {
      id     = "infrequent-access"
      status = "Enabled"
      filter {}

      transition {
        days          = rule.value
        storage_class = "STANDARD_IA"
      }
    }
  }

  depends_on = [aws_s3_bucket_versioning.product]
}

resource "aws_s3_bucket_policy" "product" {
  for_each = local.product_buckets

  bucket = aws_s3_bucket.product[each.key].id
  policy = data.aws_iam_policy_document.tls_only[each.key].json

  depends_on = [aws_s3_bucket_public_access_block.product]
}

data "aws_iam_policy_document" "tls_only" {
  for_each = local.product_buckets

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = ["arn:${local.partition}:s3:::${each.value.name}", "arn:${local.partition}:s3:::${each.value.name}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

# S3 server access logs of the two product buckets.
resource "aws_s3_bucket" "access_logs" {
  #checkov:skip=CKV_AWS_18:This is the access-log bucket; logging it into itself would log its own log writes without end.
  #checkov:skip=CKV_AWS_144:Access logs are kept for audit in one region; versioning guards them against overwrite.
  #checkov:skip=CKV_AWS_145:S3 server access logging can only deliver to a bucket encrypted with SSE-S3 (AES256), not SSE-KMS.
  #checkov:skip=CKV2_AWS_62:Nothing consumes events of the log bucket.
  bucket = "${local.bucket_prefix}-access-logs"
}

resource "aws_s3_bucket_ownership_controls" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "access_logs" {
  bucket                  = aws_s3_bucket.access_logs.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id

  rule {
    id     = "expire-logs"
    status = "Enabled"
    filter {}

    expiration {
      days = var.access_log_retention_days
    }
    noncurrent_version_expiration {
      noncurrent_days = 30
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.access_logs]
}

resource "aws_s3_bucket_policy" "access_logs" {
  bucket = aws_s3_bucket.access_logs.id
  policy = data.aws_iam_policy_document.access_logs.json

  depends_on = [aws_s3_bucket_public_access_block.access_logs]
}

# With BucketOwnerEnforced (no ACLs) the logging service is allowed by policy, and only for the
# product buckets of this account.
data "aws_iam_policy_document" "access_logs" {
  statement {
    sid       = "S3ServerAccessLogs"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.access_logs.arn}/*"]

    principals {
      type        = "Service"
      identifiers = ["logging.s3.amazonaws.com"]
    }
    condition {
      test     = "ArnLike"
      variable = "aws:SourceArn"
      values   = [for bucket in aws_s3_bucket.product : bucket.arn]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.access_logs.arn, "${aws_s3_bucket.access_logs.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}
