terraform {
  # 1.10 brought S3-native state locking (`use_lockfile`); 1.11 is what CI runs.
  required_version = ">= 1.10"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.100"
    }
  }

  # Partial configuration: bucket, key and region come from backend.hcl
  # (`terraform init -backend-config=backend.hcl`; see backend.hcl.example).
  # The lock is a `<key>.tflock` object beside the state, so no DynamoDB table is needed.
  backend "s3" {
    encrypt      = true
    use_lockfile = true
  }
}
