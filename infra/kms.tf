# One customer-managed key for the product's data at rest (data and MLflow buckets, ECR images):
# unlike SSE-S3, a CMK adds a second permission (kms:Decrypt) to every read, its use is logged in
# CloudTrail, and revoking it makes copies of the data unreadable.
resource "aws_kms_key" "main" {
  description             = "${var.project}: data and MLflow buckets, ECR images"
  enable_key_rotation     = true
  deletion_window_in_days = 30
  policy                  = data.aws_iam_policy_document.kms.json
}

resource "aws_kms_alias" "main" {
  name          = "alias/${var.project}"
  target_key_id = aws_kms_key.main.key_id
}

# The default key policy: the account (its IAM policies) governs use. Roles get only what their
# own policies grant (the instance role: decrypt/encrypt through S3 only).
data "aws_iam_policy_document" "kms" {
  #checkov:skip=CKV_AWS_109:In a key policy "*" is the key itself; this is AWS's default key policy that delegates to IAM.
  #checkov:skip=CKV_AWS_111:In a key policy "*" is the key itself; this is AWS's default key policy that delegates to IAM.
  #checkov:skip=CKV_AWS_356:In a key policy "*" is the key itself; this is AWS's default key policy that delegates to IAM.
  statement {
    sid       = "AccountAdministersThroughIAM"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }
}
