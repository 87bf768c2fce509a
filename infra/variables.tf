variable "project" {
  description = "Name prefix of every resource; the instance is tagged Name = \"<project>-app\" (what the release workflow targets)."
  type        = string
  default     = "backorder"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,19}$", var.project))
    error_message = "project must be 2-20 characters of lower-case letters, digits and hyphens, starting with a letter (it is part of S3 bucket names)."
  }
}

variable "aws_region" {
  description = "AWS region for every resource, e.g. eu-west-1; null (default): the provider's own (AWS_REGION, or the profile's)."
  type        = string
  default     = null

  validation {
    condition     = var.aws_region == null || can(regex("^[a-z]{2}(-gov)?-[a-z]+-[0-9]$", var.aws_region))
    error_message = "aws_region must be a region code such as eu-west-1."
  }
}

variable "tags" {
  description = "Extra tags for every resource (Project and ManagedBy are always set)."
  type        = map(string)
  default     = {}
}

variable "subnet_id" {
  description = "Public subnet (route to an internet gateway) for the instance; its VPC holds the security group."
  type        = string

  validation {
    condition     = can(regex("^subnet-[0-9a-f]+$", var.subnet_id))
    error_message = "subnet_id must be a subnet ID such as subnet-0123456789abcdef0."
  }
}

variable "instance_type" {
  description = "EC2 instance type for the Docker compose stack (app, Airflow, MLflow, PostgreSQL, monitoring); 16 GiB leaves room for a training run beside Airflow."
  type        = string
  default     = "t3.xlarge"
}

variable "root_volume_size_gb" {
  description = "Size of the encrypted gp3 root volume in GiB (images, PostgreSQL data, local MLflow store)."
  type        = number
  default     = 40

  validation {
    condition     = var.root_volume_size_gb >= 20 && var.root_volume_size_gb <= 1000
    error_message = "root_volume_size_gb must be between 20 and 1000."
  }
}

variable "https_ingress_cidrs" {
  description = "IPv4 CIDR blocks allowed to reach HTTPS (443) on the instance; it is the public entry, so the whole internet by default."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.https_ingress_cidrs) > 0 && alltrue([for cidr in var.https_ingress_cidrs : can(cidrhost(cidr, 0))])
    error_message = "https_ingress_cidrs must be a non-empty list of IPv4 CIDR blocks such as 203.0.113.0/24."
  }
}

variable "ssh_ingress_cidrs" {
  description = "IPv4 CIDR blocks allowed to SSH (22) to the instance. Empty (default): no SSH rule at all; use SSM Session Manager."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for cidr in var.ssh_ingress_cidrs : can(cidrhost(cidr, 0)) && !endswith(cidr, "/0")])
    error_message = "ssh_ingress_cidrs must be IPv4 CIDR blocks narrower than /0 (SSH is never open to the whole internet)."
  }
}

variable "ssh_key_name" {
  description = "Name of an existing EC2 key pair, only useful together with ssh_ingress_cidrs; null (default): none."
  type        = string
  default     = null
}

variable "egress_https_cidrs" {
  description = "IPv4 CIDR blocks the instance may reach on HTTPS (443): ECR, S3, SSM, the OS and Docker package repositories."
  type        = list(string)
  default     = ["0.0.0.0/0"]

  validation {
    condition     = length(var.egress_https_cidrs) > 0 && alltrue([for cidr in var.egress_https_cidrs : can(cidrhost(cidr, 0))])
    error_message = "egress_https_cidrs must be a non-empty list of IPv4 CIDR blocks."
  }
}

variable "compose_version" {
  description = "Docker Compose v2 release installed as the docker CLI plugin by user_data (checked against the release's published SHA-256)."
  type        = string
  default     = "v2.29.7"

  validation {
    condition     = can(regex("^v2\\.[0-9]+\\.[0-9]+$", var.compose_version))
    error_message = "compose_version must be a Compose v2 release tag such as v2.29.7."
  }
}

variable "ecr_keep_images" {
  description = "How many of the newest images the ECR lifecycle policy keeps; older ones expire (untagged ones after 1 day)."
  type        = number
  default     = 30

  validation {
    condition     = var.ecr_keep_images >= 1 && var.ecr_keep_images <= 1000 && floor(var.ecr_keep_images) == var.ecr_keep_images
    error_message = "ecr_keep_images must be a whole number between 1 and 1000."
  }
}

variable "noncurrent_version_days" {
  description = "Days an overwritten or deleted object version stays recoverable in the data and MLflow buckets."
  type        = number
  default     = 90

  validation {
    condition     = var.noncurrent_version_days >= 1
    error_message = "noncurrent_version_days must be at least 1."
  }
}

variable "data_infrequent_access_days" {
  description = "Days after which objects in the data bucket (landed batches, predictions, reports) move to STANDARD_IA."
  type        = number
  default     = 90

  validation {
    condition     = var.data_infrequent_access_days >= 30
    error_message = "data_infrequent_access_days must be at least 30 (the S3 minimum for STANDARD_IA)."
  }
}

variable "access_log_retention_days" {
  description = "Days S3 server access logs are kept in the access-log bucket."
  type        = number
  default     = 365

  validation {
    condition     = var.access_log_retention_days >= 1
    error_message = "access_log_retention_days must be at least 1."
  }
}

variable "create_github_oidc_provider" {
  description = "Create the GitHub Actions OIDC provider (token.actions.githubusercontent.com). Set false when the account already has one: an account can hold only one per URL."
  type        = bool
  default     = true
}

variable "github_repository" {
  description = "GitHub repository (\"owner/name\") whose workflows may assume the deploy role."
  type        = string

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$", var.github_repository))
    error_message = "github_repository must be \"owner/name\", e.g. my-org/backorder."
  }
}

variable "github_branch" {
  description = "Branch whose workflow runs may assume the deploy role."
  type        = string
  default     = "main"
}

variable "github_release_tag_pattern" {
  description = "Git tags (a StringLike pattern) whose workflow runs may assume the deploy role: the release workflow builds and pushes on tag pushes. Empty string: none."
  type        = string
  default     = "v*"
}

variable "github_environment" {
  description = "GitHub environment whose jobs may assume the deploy role (a job with `environment:` gets an environment subject, not a branch one)."
  type        = string
  default     = "production"
}

variable "create_github_terraform_roles" {
  description = "Create the roles .github/workflows/terraform.yml assumes: a read-only plan role (pull requests and github_branch) and an apply role (github_terraform_environment only). False: bring your own."
  type        = bool
  default     = true
}

variable "github_terraform_environment" {
  description = "GitHub environment whose jobs may assume the Terraform apply role (the apply job of terraform.yml; give it required reviewers)."
  type        = string
  default     = "infrastructure"

  validation {
    condition     = can(regex("^[A-Za-z0-9_.-]+$", var.github_terraform_environment))
    error_message = "github_terraform_environment must be a GitHub environment name such as infrastructure."
  }
}

variable "terraform_state_bucket" {
  description = "S3 bucket holding this module's state (backend.hcl's bucket); the Terraform roles may read it and take the lock. Required when create_github_terraform_roles is true."
  type        = string
  default     = null

  validation {
    condition = (
      var.terraform_state_bucket == null
      ? !var.create_github_terraform_roles
      : can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.terraform_state_bucket))
    )
    error_message = "terraform_state_bucket must name the state bucket (backend.hcl's bucket) when create_github_terraform_roles is true."
  }
}

variable "terraform_state_key" {
  description = "Key of this module's state object in terraform_state_bucket (backend.hcl's key); the lock is the object <key>.tflock beside it."
  type        = string
  default     = "backorder/production/terraform.tfstate"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()/-]+$", var.terraform_state_key)) && !startswith(var.terraform_state_key, "/")
    error_message = "terraform_state_key must be an S3 key such as backorder/production/terraform.tfstate."
  }
}
