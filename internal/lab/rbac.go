package lab

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
)

// Apply creates each object as a cluster administrator would with kubectl apply (an
// object that exists is updated), for the kinds the agent's RBAC manifests hold. It
// waits until every service-account token Secret has its token.
func Apply(ctx context.Context, cs kubernetes.Interface, objs []runtime.Object) error {
	for _, o := range objs {
		var err error
		switch x := o.(type) {
		case *corev1.Namespace:
			_, err = cs.CoreV1().Namespaces().Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				err = nil
			}
		case *corev1.ServiceAccount:
			_, err = cs.CoreV1().ServiceAccounts(x.Namespace).Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				err = nil
			}
		case *corev1.Secret:
			_, err = cs.CoreV1().Secrets(x.Namespace).Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				err = nil
			}
		case *rbacv1.Role:
			_, err = cs.RbacV1().Roles(x.Namespace).Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				_, err = cs.RbacV1().Roles(x.Namespace).Update(ctx, x, metav1.UpdateOptions{})
			}
		case *rbacv1.RoleBinding:
			_, err = cs.RbacV1().RoleBindings(x.Namespace).Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				_, err = cs.RbacV1().RoleBindings(x.Namespace).Update(ctx, x, metav1.UpdateOptions{})
			}
		case *rbacv1.ClusterRole:
			_, err = cs.RbacV1().ClusterRoles().Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				_, err = cs.RbacV1().ClusterRoles().Update(ctx, x, metav1.UpdateOptions{})
			}
		case *rbacv1.ClusterRoleBinding:
			_, err = cs.RbacV1().ClusterRoleBindings().Create(ctx, x, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				_, err = cs.RbacV1().ClusterRoleBindings().Update(ctx, x, metav1.UpdateOptions{})
			}
		default:
			err = fmt.Errorf("lab.Apply: no handling for %T", o)
		}
		if err != nil {
			return fmt.Errorf("apply %T: %w", o, err)
		}
	}
	for _, o := range objs {
		s, ok := o.(*corev1.Secret)
		if !ok || s.Type != corev1.SecretTypeServiceAccountToken {
			continue
		}
		err := WaitFor(ctx, time.Minute, "the token controller to fill "+s.Name, func(ctx context.Context) error {
			cur, err := cs.CoreV1().Secrets(s.Namespace).Get(ctx, s.Name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			if len(cur.Data[corev1.ServiceAccountTokenKey]) == 0 {
				return fmt.Errorf("no token yet")
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	return nil
}

// ApplyYAML applies a YAML stream of the kinds Apply handles, as `kubectl apply -f -`
// would take what `pve-vault-agent rbac` prints.
func ApplyYAML(ctx context.Context, cs kubernetes.Interface, stream string) error {
	var objs []runtime.Object
	for _, doc := range strings.Split(stream, "\n---\n") {
		if strings.TrimSpace(stripComments(doc)) == "" {
			continue
		}
		o, _, err := scheme.Codecs.UniversalDeserializer().Decode([]byte(doc), nil, nil)
		if err != nil {
			return fmt.Errorf("decode a manifest: %w", err)
		}
		objs = append(objs, o)
	}
	return Apply(ctx, cs, objs)
}

func stripComments(doc string) string {
	var keep []string
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") && strings.TrimSpace(l) != "---" {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}
