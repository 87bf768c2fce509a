# The instance that runs the Docker compose stack. Deployment is SSM send-command from GitHub
# Actions (github.tf): no SSH and no static keys; the containers get AWS credentials from the
# instance profile through IMDSv2.

data "aws_ssm_parameter" "al2023" {
  name = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
}

data "aws_subnet" "app" {
  id = var.subnet_id
}

resource "aws_security_group" "app" {
  name        = "${var.project}-app"
  description = "${var.project} app instance: HTTPS in, SSH only from listed CIDRs, HTTPS out"
  vpc_id      = data.aws_subnet.app.vpc_id

  tags = {
    Name = "${var.project}-app"
  }
}

resource "aws_vpc_security_group_ingress_rule" "https" {
  for_each = toset(var.https_ingress_cidrs)

  security_group_id = aws_security_group.app.id
  description       = "HTTPS to the app's reverse proxy from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

# No rule at all unless ssh_ingress_cidrs lists some (the variable refuses /0).
resource "aws_vpc_security_group_ingress_rule" "ssh" {
  for_each = toset(var.ssh_ingress_cidrs)

  security_group_id = aws_security_group.app.id
  description       = "SSH for operators from ${each.value}"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = each.value
}

# Egress is HTTPS only: ECR, S3, SSM, STS, KMS, the AL2023 and Docker/GitHub downloads and the
# ACME CA all speak 443. DNS (VPC resolver), NTP (169.254.169.123) and IMDS are link-local or
# VPC-internal and not filtered by security groups, so nothing else is needed.
resource "aws_vpc_security_group_egress_rule" "https" {
  for_each = toset(var.egress_https_cidrs)

  security_group_id = aws_security_group.app.id
  description       = "HTTPS to AWS APIs, package repositories and the ACME CA (${each.value})"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = each.value
}

resource "aws_iam_role" "instance" {
  name               = "${var.project}-instance"
  description        = "${var.project} app instance: SSM agent, ECR pull, the product buckets"
  assume_role_policy = data.aws_iam_policy_document.instance_trust.json
}

data "aws_iam_policy_document" "instance_trust" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy_attachment" "instance_ssm" {
  role       = aws_iam_role.instance.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

resource "aws_iam_role_policy" "instance_ecr_pull" {
  name   = "ecr-pull"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.instance_ecr_pull.json
}

data "aws_iam_policy_document" "instance_ecr_pull" {
  statement {
    sid = "EcrLogin"
    # GetAuthorizationToken has no resource-level permissions: "*" is the only valid resource.
    actions   = ["ecr:GetAuthorizationToken"]
    resources = ["*"]
  }
  statement {
    sid = "PullProductImage"
    actions = [
      "ecr:BatchCheckLayerAvailability",
      "ecr:BatchGetImage",
      "ecr:GetDownloadUrlForLayer",
    ]
    resources = [aws_ecr_repository.app.arn]
  }
}

resource "aws_iam_role_policy" "instance_s3" {
  name   = "product-buckets"
  role   = aws_iam_role.instance.id
  policy = data.aws_iam_policy_document.instance_s3.json
}

# Read, write and delete objects (the product writes atomically: a staged object, then a copy and
# a delete) in the two product buckets only; the key only through S3. GetObject on the data
# bucket also covers releases/<tag>/stack.tar.gz, which the deploy command downloads.
data "aws_iam_policy_document" "instance_s3" {
  statement {
    sid = "ListProductBuckets"
    actions = [
      "s3:GetBucketLocation",
      "s3:ListBucket",
      "s3:ListBucketMultipartUploads",
    ]
    resources = [for bucket in aws_s3_bucket.product : bucket.arn]
  }
  statement {
    sid = "ReadWriteProductObjects"
    actions = [
      "s3:AbortMultipartUpload",
      "s3:DeleteObject",
      "s3:GetObject",
      "s3:ListMultipartUploadParts",
      "s3:PutObject",
    ]
    resources = [for bucket in aws_s3_bucket.product : "${bucket.arn}/*"]
  }
  # The release stacks are root's input on this host (docker compose runs them): the app's
  # containers share this role, so they may read releases/ but never replace what gets deployed.
  statement {
    sid    = "ReleaseStacksAreReadOnly"
    effect = "Deny"
    actions = [
      "s3:DeleteObject",
      "s3:PutObject",
    ]
    resources = local.release_stacks_arns
  }
  statement {
    sid       = "ProductKeyThroughS3"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey"]
    resources = [aws_kms_key.main.arn]
    condition {
      test     = "StringEquals"
      variable = "kms:ViaService"
      values   = ["s3.${local.region}.amazonaws.com"]
    }
  }
}

resource "aws_iam_instance_profile" "app" {
  name = "${var.project}-app"
  role = aws_iam_role.instance.name
}

resource "aws_instance" "app" {
  #checkov:skip=CKV_AWS_88:The instance is the public HTTPS entry (no load balancer); it needs a public address from first boot for user_data's downloads. Only 443 (and SSH from listed CIDRs) is open.
  ami                         = data.aws_ssm_parameter.al2023.insecure_value
  instance_type               = var.instance_type
  subnet_id                   = var.subnet_id
  vpc_security_group_ids      = [aws_security_group.app.id]
  iam_instance_profile        = aws_iam_instance_profile.app.name
  associate_public_ip_address = true
  key_name                    = var.ssh_key_name
  monitoring                  = true
  ebs_optimized               = true

  metadata_options {
    http_endpoint = "enabled"
    http_tokens   = "required"
    # 2, not 1: containers on Docker's bridge network are one hop further and need IMDSv2 to
    # get the instance profile's credentials (the product reads S3 with them).
    http_put_response_hop_limit = 2
  }

  root_block_device {
    volume_type           = "gp3"
    volume_size           = var.root_volume_size_gb
    encrypted             = true
    delete_on_termination = true
  }

  user_data = templatefile("${path.module}/user_data.sh.tftpl", {
    project            = var.project
    region             = local.region
    compose_version    = var.compose_version
    ecr_repository_url = aws_ecr_repository.app.repository_url
    data_bucket        = aws_s3_bucket.product["data"].id
    mlflow_bucket      = aws_s3_bucket.product["mlflow"].id
  })

  tags = {
    Name = local.instance_name
  }

  lifecycle {
    # A newer AL2023 AMI or edited user_data must not replace (or restart) the instance that
    # holds the stack's PostgreSQL data; roll it on purpose: terraform apply -replace=aws_instance.app
    ignore_changes = [ami, user_data]
  }
}

# A stable public address for the DNS record and the TLS certificate.
resource "aws_eip" "app" {
  domain   = "vpc"
  instance = aws_instance.app.id

  tags = {
    Name = local.instance_name
  }
}
